"""Analyses of task vectors and merges that chapters share: the stability bound (:mod:`.stability`),
measured generalization (:mod:`.generalization`), gradient alignment (:mod:`.alignment`), spectra
(:mod:`.spectra`) and singular task interference (:mod:`.interference`). Never imports a chapter."""
