from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="embedtrain",
    version="0.1.0",
    description="Train bidirectional Llama embedding models with DeepSpeed ZeRO-3 and export them "
                "in the Hugging Face format of NVIDIA's released embedding models.",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["embedtrain", "embedtrain.*"]),
    package_data={"embedtrain": ["recipes/*.yaml", "assets/*/*", "assets/*/*/*"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.2,<6",
        "accelerate",
        "datasets",
        "pyarrow",
        "tensorboard",
        "click",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
    ],
    extras_require={"test": ["pytest", "sentence-transformers"]},
    entry_points={"console_scripts": ["embedtrain=embedtrain.cli:main"]},
)
