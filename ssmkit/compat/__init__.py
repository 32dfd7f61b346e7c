"""Drop-in function names and layouts of other packages, running on any device through ssmkit."""
