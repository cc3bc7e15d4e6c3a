from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="torchpocket",
    version="0.1.0",
    description="Automated model compression for PyTorch: channel pruning, sparsification, quantization, "
    "searched per layer by DDPG / BO / TPE / evolution",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["torchpocket", "torchpocket.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pyyaml",
        "tqdm",
        "optuna>=3.4",
        "scikit-learn",
        "scikit-optimize>=0.10",  # --hpo gp (archived upstream: gp falls back to Optuna's GP if it ever breaks)
        "scipy",  # the sensitivity optimizer's integer programme (scipy.optimize.milp)
        "matplotlib",
        "torch-pruning>=1.5",
        "onnx",
        "onnxruntime",
    ],
    extras_require={
        "gp": [],  # scikit-optimize is a core dependency now; the extra stays so old install lines work
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "ruff", "psycopg[binary]", "optuna-dashboard"],
        "dist": ["psycopg[binary]"],  # PostgreSQL storage for parallel search workers (SQLAlchemy 2 driver)
        "dashboard": ["optuna-dashboard"],  # python run.py --dashboard runs/<run>
        "timm": ["timm"],  # --net timm:<name>
    },
    entry_points={"console_scripts": ["torchpocket=torchpocket.cli:main"]},
)
