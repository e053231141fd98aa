"""Tests for minidalle2.realdata, offline: tiny fake files in the exact on-disk formats torchvision reads."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from minidalle2.lab.realdata import class_names, expected_files, load_real


def write_idx(path, array):
    """IDX ubyte format: big-endian magic 0x0000 08 <ndim>, one big-endian uint32 per dim, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def fake_mnist(root, folder="MNIST", n_train=6, n_test=4):
    """Write <root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; returns the arrays."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
        arrays[prefix] = (images, labels)
    return arrays


def fake_cifar10(root, per_batch=3):
    """Write <root>/cifar-10-batches-py/ with the 5 train batches, test_batch and batches.meta (pickles)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    batches = {}
    for i, filename in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        labels = [(i + j) % 10 for j in range(per_batch)]
        with open(os.path.join(folder, filename), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches[filename] = (data, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": class_names("cifar10")}, f)
    return batches


def check_images(dataset, shape):
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == shape
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert isinstance(label, int) and 0 <= label < 10


def test_mnist_train_and_test(tmp_path):
    arrays = fake_mnist(tmp_path)
    train = load_real("mnist", tmp_path)
    assert len(train) == 6
    check_images(train, (1, 32, 32))
    image, label = train[1]
    assert label == 1
    # 28 -> 32 by a 2-pixel black border: the border is -1, the centre is the original pixels mapped to [-1, 1]
    assert torch.all(image[:, :2, :] == -1) and torch.all(image[:, :, -2:] == -1)
    expected = torch.from_numpy(arrays["train"][0][1]).float() / 255 * 2 - 1
    assert torch.allclose(image[0, 2:30, 2:30], expected, atol=1e-6)
    test = load_real("mnist", tmp_path, split="test")
    assert len(test) == 4 and [test[i][1] for i in range(4)] == [0, 1, 2, 3]


def test_mnist_rgb_and_resolution(tmp_path):
    fake_mnist(tmp_path)
    rgb = load_real("mnist", tmp_path, channels=3)
    check_images(rgb, (3, 32, 32))
    image, _ = rgb[0]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # gray repeated
    check_images(load_real("mnist", tmp_path, resolution=64), (1, 64, 64))
    check_images(load_real("mnist", tmp_path, resolution=16, channels=3), (3, 16, 16))


def test_fashion_mnist(tmp_path):
    fake_mnist(tmp_path, folder="FashionMNIST", n_test=5)
    test = load_real("fashion_mnist", tmp_path, split="test")
    assert len(test) == 5
    check_images(test, (1, 32, 32))
    assert class_names("fashion_mnist")[9] == "ankle boot"


def test_cifar10(tmp_path):
    batches = fake_cifar10(tmp_path)
    train = load_real("cifar10", tmp_path)
    assert len(train) == 15  # 5 batches of 3
    check_images(train, (3, 32, 32))
    image, label = train[0]
    data, labels = batches["data_batch_1"]
    assert label == labels[0]
    expected = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255 * 2 - 1
    assert torch.allclose(image, expected, atol=1e-6)
    test = load_real("cifar10", tmp_path, split="test", channels=1, resolution=64)
    assert len(test) == 3 and [test[i][1] for i in range(3)] == batches["test_batch"][1]
    check_images(test, (1, 64, 64))


def test_missing_files_raise_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_real("mnist", tmp_path)  # download is off by default: nothing is fetched
    assert os.path.join(str(tmp_path), "MNIST", "raw") in str(info.value)
    assert "train-images-idx3-ubyte" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_real("cifar10", tmp_path)
    # a partial copy names exactly what is missing
    fake_cifar10(tmp_path)
    os.remove(os.path.join(tmp_path, "cifar-10-batches-py", "test_batch"))
    with pytest.raises(FileNotFoundError, match=r"files not found; .*: test_batch\. "):
        load_real("cifar10", tmp_path, split="train")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*'cifar10', 'fashion_mnist', 'mnist'"):
        load_real("svhn", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_real("mnist", tmp_path, split="val")
    with pytest.raises(ValueError, match="channels"):
        load_real("mnist", tmp_path, channels=2)


def test_class_names_and_expected_files(tmp_path):
    for name in ("mnist", "fashion_mnist", "cifar10"):
        assert len(class_names(name)) == 10
        assert all(path.startswith(str(tmp_path)) for path in expected_files(name, tmp_path))
    assert class_names("cifar10")[0] == "airplane"
    assert len(expected_files("cifar10", tmp_path)) == 7
