"""What operators use: status figures, requeueing failures, learner traces, metrics, previews."""
