"""Pure-torch math of DoRA (tracker, Sinkhorn-Knopp, loss, schedules, EMA); nothing here imports Lightning."""
