"""The experiments that show the method: the offline demo (Fig. 2), method comparisons, the HH reward experiment
(Fig. 3), and their shared runner, tables and figures."""
