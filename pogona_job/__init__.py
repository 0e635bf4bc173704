"""pogona-train: a YOLO training job that refuses to burn hours learning nothing."""

import time

PROCESS_START = time.monotonic()  # for the start-up timing (process start to first training batch)
