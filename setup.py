from setuptools import find_packages, setup

setup(
    name="dcama-triton",
    version="0.1.0",
    description="DCAMA few-shot segmentation with fused Triton attention kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "dcama", "dcama.*"]),
    package_data={"dcama.data": ["splits/*/*.txt", "splits/*/*/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "triton; platform_system == 'Linux'",
        "timm>=1.0",
        "pycocotools",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        # matplotlib: the bench tests draw a plot; import-linter: the suite checks the layers (.importlinter);
        # pytest-xdist: the suite runs on every core (README, "Test")
        "test": ["pytest", "pytest-xdist", "matplotlib", "import-linter"],
        "bench": ["matplotlib"],
    },
)
