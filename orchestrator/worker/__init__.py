"""Inside a rank: the training process's runtime, its context, channel, environment, network and the
zygote it may be forked from."""
