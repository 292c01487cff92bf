from setuptools import find_packages, setup

setup(
    name="fedmpi",
    version="0.1.0",
    description="Federated averaging (FedAvg) as an MPI job on HPC clusters",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fedmpi", "fedmpi.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "numpy", "h5py", "mpi4py", "pyyaml",
                      "dp-accounting>=0.6", "cryptography>=50"],  # the versions tested
    extras_require={
        "mpich": ["mpich"],
        "report": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "test": ["pytest", "hypothesis", "matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["fedmpi=fedmpi.cli:main"]},
)
