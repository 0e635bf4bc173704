from pogona_job.cli import entry

entry()
