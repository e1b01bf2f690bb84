"""What every stage shares: config schemas, errors and exit statuses, dtypes, the process group, the run spec."""
