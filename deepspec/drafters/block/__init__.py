"""Block drafters: DFlash and DSpark (model, loss, proposer, calibration, checkpoint formats)."""
