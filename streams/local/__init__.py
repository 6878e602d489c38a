"""Running the whole system on one machine: child-process services, supervisor, up, status, generate, demo, report."""
