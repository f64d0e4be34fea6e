"""A seconds-sized config for tests: tiny models, few steps."""
from configs import base


def get_config():
    c = base.get_config()
    c.sasrec.batch_size = 32
    c.sasrec.epochs = 2
    c.sasrec.eval_every_epochs = 1
    c.sasrec.checkpoint_every_epochs = 1
    c.log_every_steps = 5
    return c
