"""hpc-uc: Unlearnable Clusters for image datasets, trained data-parallel over MPI ranks."""
__version__ = "0.1.0"
