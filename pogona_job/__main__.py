from pogona_job.cli import main

raise SystemExit(main())
