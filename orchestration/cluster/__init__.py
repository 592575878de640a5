"""Where the job runs: the cluster interface, its SLURM and local implementations, signals and
the process-group start-up.

A new launcher (Kubernetes, Ray, plain ssh) implements :class:`~orchestration.cluster.base.Cluster`
and adds itself to ``base.CLUSTERS``; nothing else in the project knows which one is in use.
This file imports nothing, so ``python3 -m orchestration.cluster.nodelist`` runs without torch.
"""
