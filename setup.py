from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="simmim-fast",
    version="0.1.0",
    description="SimMIM masked image modeling pretraining: exact, fused and fast",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The fused ops are their own distribution, simmim-kernels (kernels/, torch + triton only), which
    # other MIM code installs on its own; simmim_fast.kernels re-exports it.
    packages=find_packages(include=["simmim_fast", "simmim_fast.*"]),
    include_package_data=True,
    install_requires=[
        "simmim-kernels>=0.1",  # kernels/ in this repository: pip install -e ./kernels -e .
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "timm>=1.0.9,<2",
        "torchvision>=0.19",
        "numpy>=1.24",
        "Pillow>=9",
        "tifffile>=2023.1",  # multi-band and 16-bit TIFF (satellite, microscopy) for in_chans != 3
        "scikit-image>=0.21",  # ships the sample photos of the embedded default dataset
        "matplotlib>=3.6",
        "tensorboard>=2.12",
        "safetensors>=0.4",
        "simplejpeg>=1.6",  # libjpeg-turbo in strict mode: the corrupt-JPEG check every backend shares
        "tqdm>=4.60",
    ],
    entry_points={"console_scripts": ["simmim-fast = simmim_fast.cli:main"]},
    extras_require={
        "dali": ["nvidia-dali-cuda130>=1.40"],
        "deepspeed": ["deepspeed>=0.15"],
        "hf": ["transformers>=5,<6"],  # export --format hf (5.x attention names q_proj/k_proj/v_proj/o_proj)
        "wandb": ["wandb>=0.17"],
        "mlflow": ["mlflow>=2.12"],
        "dev": [
            "deepspeed>=0.15",
            "nvidia-dali-cuda130>=1.40",
            "transformers>=5,<6",
            "wandb>=0.17",
            "mlflow>=2.12",
            "pytest>=7",
            "pytest-benchmark>=4",
            "pytest-timeout>=2",
        ],
    },
)
