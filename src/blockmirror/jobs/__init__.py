"""Jobs: the job state machine, the job manager and the mirror block job."""
