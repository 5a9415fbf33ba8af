"""Reference Grad-CAM with GradientTape, to hold the device's CAM against.

Grad-CAM (Selvaraju et al.) weights each feature map by the spatial mean of the
gradient of the class score and sums. Here the score is the pre-activation
logit (use -logit for the negative class). For the GAP + Dense head this equals
ReLU(sum_k w_k A_k) up to the factor 1/(H*W), which `head_cam` computes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from training.model import feature_model, head_weights


def grad_cam(model, images: np.ndarray, positive: bool = True) -> np.ndarray:
    """Grad-CAM maps (N x h x w, ReLU'd, unnormalized) of the positive or negative class."""
    fm_model = feature_model(model)
    x = tf.convert_to_tensor(images.astype(np.float32))
    with tf.GradientTape() as tape:
        logit, fmap = fm_model(x, training=False)
        score = logit[:, 0] if positive else -logit[:, 0]
    grads = tape.gradient(score, fmap)
    alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(alpha * fmap, axis=-1)).numpy()


def head_cam(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(signed CAM N x h x w = sum_k w_k A_k, logits N) from the Dense weights, no gradients."""
    fm_model = feature_model(model)
    logit, fmap = fm_model(images.astype(np.float32), training=False)
    kernel, _ = head_weights(model)
    return np.tensordot(np.asarray(fmap), kernel[:, 0], axes=([3], [0])), np.asarray(logit)[:, 0]
