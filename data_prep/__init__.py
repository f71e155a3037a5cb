"""Preprocess datasets into the sharded HDF5 format every hpc-uc stage reads."""
