import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def ssl_caplog(caplog):
    """caplog that also sees the 'ssl_kit' logger (which does not propagate once the CLI configured it)."""
    logger = logging.getLogger("ssl_kit")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="ssl_kit")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def fmnist_images():
    """The first 500 Fashion-MNIST test images, ``[500, 1, 28, 28]`` uint8 (the Debian dataset package)."""
    from ssl_kit.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return images[:500]
