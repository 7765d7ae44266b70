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
    # ds_configs/ lives at the top of the repository and installs as embedtrain/ds_configs, so that a
    # non-editable install finds the DeepSpeed configs that the recipes name
    packages=[*find_packages(include=["embedtrain", "embedtrain.*"]), "embedtrain.ds_configs"],
    package_dir={"embedtrain.ds_configs": "ds_configs"},
    package_data={"embedtrain": ["recipes/*.yaml", "assets/*/*", "assets/*/*/*"], "embedtrain.ds_configs": ["*.json"]},
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals (weights_only checkpoint loading)
        # the range in which embedtrain's non-finite-step policy was verified: ZeRO-3 skips a step
        # whose gradient norm is not finite in any dtype, ZeRO-1/2 with bf16.check_grad_overflow
        "deepspeed>=0.19.8,<0.20",
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
    extras_require={
        # peft in the test extra too: CI installs .[test] and runs the LoRA tests; pytest-xdist: the
        # suite runs on two workers (tests/pytest.ini); setuptools >= 70.1
        # builds wheels without the `wheel` package (tests/test_packaging.py builds one)
        # pytest below 9.2: its Node.nodeid no longer reads the _nodeid that pytest-xdist 3.8 sets for
        # --dist loadgroup, so the groups are silently dropped (tests/conftest.py checks for it)
        "test": ["pytest<9.2", "pytest-xdist", "sentence-transformers>=6.3", "peft", "setuptools>=70.1"],
        "liger": ["liger-kernel"],
        # model.lora: LoRA adapters (peft.inject_adapter_in_model; adapters saved in peft's format)
        "lora": ["peft"],
    },
    entry_points={"console_scripts": ["embedtrain=embedtrain.cli:main"]},
)
