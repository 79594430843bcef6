"""One router per resource: plans, jobs, probes, health, metrics, and the HTML pages."""
