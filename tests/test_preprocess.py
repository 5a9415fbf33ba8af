"""The preprocessing contract shared by training and the device."""

from __future__ import annotations

import numpy as np
import pytest

from device.preprocess import PreprocessContract, crop_cell, pad_to_square, prepare_cell


def test_prepare_cell_keeps_uint8_0_255_and_never_normalizes():
    img = np.zeros((50, 30, 3), dtype=np.uint8)
    img[..., 0] = 255
    out = prepare_cell(img, PreprocessContract(input_size=32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.max() == 255  # raw pixel range: EfficientNet normalizes inside its graph


def test_pad_to_square_centres_on_black():
    img = np.full((10, 4, 3), 200, dtype=np.uint8)
    sq = pad_to_square(img)
    assert sq.shape == (10, 10, 3)
    assert sq[:, :3].max() == 0 and sq[:, 3:7].min() == 200 and sq[:, 7:].max() == 0


def test_crop_cell_masks_background_black_and_centres_the_cell():
    field = np.full((100, 100, 3), 180, dtype=np.uint8)
    field[40:60, 40:60] = (120, 60, 160)
    mask = np.zeros((30, 30), dtype=bool)
    mask[5:25, 5:25] = True
    contract = PreprocessContract(input_size=36, crop_padding=0.1)
    out = crop_cell(field, (35, 35, 65, 65), mask, contract)
    assert out.shape == (36, 36, 3)
    assert out[0, 0].max() == 0  # outside the mask: black, like C-NMC
    centre = out[18, 18]
    assert abs(int(centre[0]) - 120) <= 2 and abs(int(centre[2]) - 160) <= 2


def test_crop_cell_keep_background_uses_the_field():
    field = np.full((100, 100, 3), 180, dtype=np.uint8)
    out = crop_cell(field, (40, 40, 60, 60), None, PreprocessContract(input_size=20, background="keep"))
    assert out.min() == 180


def test_contract_checks_its_fields():
    with pytest.raises(ValueError, match="background"):
        PreprocessContract(background="grey")
    with pytest.raises(ValueError, match="input_size"):
        PreprocessContract(input_size=4)
    c = PreprocessContract(input_size=64)
    assert PreprocessContract.from_dict(c.to_dict()) == c


def test_crop_cell_rejects_broken_input():
    field = np.zeros((10, 10, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="empty cell box"):
        crop_cell(field, (5, 5, 5, 9), None, PreprocessContract(input_size=16))
    with pytest.raises(ValueError, match="uint8"):
        crop_cell(field.astype(np.float32), (0, 0, 5, 5), None, PreprocessContract(input_size=16))
