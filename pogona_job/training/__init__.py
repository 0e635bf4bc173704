"""Training: ultralytics run offline on the chosen device, watched batch by batch, checkpointed to S3.

The public face is `phase` (one training phase and its results); below it `trainer` (the ultralytics
trainer with our callbacks), `gate` (the sanity verdict and the watchdog), `checkpoint` (sets in the
bucket), `gpu_policy`, `offline` and `columns` (ultralytics' metric names). Takes narrow inputs from the
run layer; knows nothing of manifests, leases or reports.
"""

from pogona_job.training.phase import (
    Hardware,
    PhaseResult,
    Plan,
    batch_loss_fn,
    completed_phase,
    describe_hardware,
    final_metrics,
    first_epochs,
    load_model,
    partial_phase,
    read_results,
    resolve_device,
    resolve_workers,
    resource_plan,
    torch_device,
    train_phase,
)

__all__ = [
    "Hardware",
    "PhaseResult",
    "Plan",
    "batch_loss_fn",
    "completed_phase",
    "describe_hardware",
    "final_metrics",
    "first_epochs",
    "load_model",
    "partial_phase",
    "read_results",
    "resolve_device",
    "resolve_workers",
    "resource_plan",
    "torch_device",
    "train_phase",
]
