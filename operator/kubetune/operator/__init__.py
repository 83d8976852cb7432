"""kubetune.operator: the kopf operator that turns FineTuneJobs into batch/v1 Jobs and keeps .status true."""
