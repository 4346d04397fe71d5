"""The evaluation layer: prediction metrics, membership-inference attacks (loss threshold, LiRA,
the forget score) and the privacy evaluation of an unlearned model. Reads the core; never the
application layer."""
