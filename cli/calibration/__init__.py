"""``thinkcap calibrate``'s parts: the dataset and its graders, the runner, the output."""
