"""The study: sweeps over methods and precisions, a results store, reports and plots."""
