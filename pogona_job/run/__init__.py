"""One run of the job: the story (`job`), its lease, budget, live status, report, lineage, cloud
metadata and notifications. The only layer that sees `Settings` and the run's state."""
