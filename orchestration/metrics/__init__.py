"""What a run measures and records: the metrics log (``logger``), FLOPs and MFU (``flops``)
and the provenance record of each job start (``run_record``)."""
