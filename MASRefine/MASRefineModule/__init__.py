"""The MASRefine module's Python package (beside MASRefine.py, as SlicerNNUnet's SlicerNNUNetLib):

- ``Parameters``: the choices and the parameter node;
- ``Environment``: where MASRefineLib is, the worker's interpreter and environment, requirements;
- ``Job``: the handle of one background run, and the guards that stop workers with the scene;
- ``Dependencies``: installed versions of the worker's packages, installing them in the background;
- ``Logic``: MASRefineLogic (the console API);
- ``Results``: a finished run's outputs as nodes, atlas display for QA;
- ``Sample``: the built-in phantom in the Sample Data module;
- ``SceneAtlas``: atlas sets from the scene's segmentations, and adding a corrected result to the atlas set;
- ``Test``: MASRefineTest, the self-test.

Slicer's *Reload* re-executes MASRefine.py only; MASRefineWidget.onReload reloads these first, in
the order of SUBMODULES (each after the ones it imports).
"""

SUBMODULES = ("Environment", "Parameters", "Job", "Results", "Dependencies", "Sample", "SceneAtlas", "Logic", "Test")
