"""The paper's method, each module with the config of what it computes and citing its equations:
``texture`` (LAWS texture energy and L_LAWS, Eq. 5-6), ``bns`` (BN statistics and the BNS losses,
Eq. 3, 7, 8, 11), ``calibration`` (the calibration set and its centers, Eq. 10), ``generator``
(GDFQ's generator and its training settings, Eq. 12), ``mixup`` (Eq. 9), ``kd`` (the KL term of
Eq. 13-14), ``augment`` (crops of calibration images), ``finetune`` (steps 2-3: G and Q trained
together, Eq. 12-14), and ZeroQ's ``distill`` (the baseline's distilled images). Nothing here knows
of files, runs or methods' names: ``texq.run`` puts these together."""
