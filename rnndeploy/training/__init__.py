"""The pieces `rnndeploy.train` wires into a training run, one job each.

- `options`: what a run is given and gives back (`TrainOptions`, `TrainResult`, the errors, file names).
- `signals`: SIGINT/SIGTERM turned into a stop at a safe point, and the message that says what is on disk.
- `step`: one optimizer step (backward, clipping, the decisions all processes share), shared with
  `rnndeploy.longlag`.
- `validation`: the validation loss and the records it goes into.
- `processes`: the distributed side (process group, DDP wrapper, collectives).
- `checkpoints`: saving and restoring a run, and the checks that a resume continues the same run.
- `runlog`: the JSON-lines log and the loss curve.
- `resources`: what a run needs of its device (support for the options, memory, time per step).
- `report`: what a person at the terminal is told.

These modules import one another in one direction only (tests/test_train.py checks it) and never
import `rnndeploy.train`.
"""
