"""What a run taught the model: task metrics from greedy generations on held-out rows, beside the eval loss."""
