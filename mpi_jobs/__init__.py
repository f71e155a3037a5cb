"""Job scripts for running hpc-uc on clusters: LSF + jsrun (Summit), Slurm + srun, plain mpirun.

``plan`` turns a global batch into ranks and nodes, ``render`` fills the templates in
``templates/``, ``submit`` writes a script into its run directory and hands it to the
scheduler. Guide: docs/clusters.md.
"""
