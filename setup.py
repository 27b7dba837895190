from setuptools import find_packages, setup

setup(
    name="ovd",
    version="0.1.0",
    description="Open-vocabulary object detection: region-based knowledge distillation and pseudo image-level supervision",
    python_requires=">=3.10",
    packages=find_packages(include=["ovd", "ovd.*"]),
    package_data={"ovd.clip": ["model_configs/*.json"]},
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "numpy>=1.24",
        "open-clip-torch>=3.0,<4",
        "pycocotools>=2.0.7",
        "faster-coco-eval>=1.6",
        "opencv-python-headless>=4.8",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "pillow>=10",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "scikit-image>=0.22",
    ],
    extras_require={
        "test": ["pytest>=8", "playwright>=1.50"],  # playwright drives the system chromium
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],
        "web": ["gradio>=6.31,<7"],
    },
)
