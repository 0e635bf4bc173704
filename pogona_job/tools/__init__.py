"""What the CLI offers besides the job itself: `runs` (list, show), the demo dataset, the local
rehearsal (`make run-local`) and the loopback SeaweedFS server it and the tests use."""
