import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices, so tf.distribute tests can mirror across replicas
# on a CPU-only machine. Must run before TensorFlow initializes its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def strategy():
    """Two replicas on the two logical CPUs. One per process: a second
    MirroredStrategy over the same devices breaks the first's collectives."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
