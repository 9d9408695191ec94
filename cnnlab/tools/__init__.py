"""Tools that use a trained model: above training, below the command line.

`predict.py` classifies image files with a run's checkpoint and the
preprocessing it was trained with. Export, serving, inspection, tuning and
compression land here too, each as a module of its own that reads checkpoints
and run directories (cnnlab.train) and the fast forward pass (cnnlab.fast),
and that nothing below imports.
"""
