"""What every stage shares and none owns: the observer interface, the log format and PHI mask, config checks."""
