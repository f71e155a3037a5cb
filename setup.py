"""hpc-uc: Unlearnable Clusters for medical image datasets, trained data-parallel over MPI."""
from setuptools import find_packages, setup

setup(
    name="hpc-uc",
    version="0.1.0",
    description="Make image datasets unlearnable (Unlearnable Clusters), trained data-parallel over MPI",
    packages=find_packages(include=["hpc_uc", "hpc_uc.*", "data_prep", "data_prep.*",
                                    "mpi_jobs", "mpi_jobs.*"]),
    package_data={"mpi_jobs": ["templates/*.tmpl"]},
    python_requires=">=3.10",
    install_requires=[
        "torch", "torchvision", "mpi4py", "h5py", "medmnist", "numpy",
        "scikit-learn", "tqdm", "pyyaml", "matplotlib", "torchmetrics",
    ],
    extras_require={"horovod": ["horovod==0.28.1"], "test": ["pytest"]},
    entry_points={"console_scripts": ["hpc-uc = hpc_uc.cli:main"]},
)
