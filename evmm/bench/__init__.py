"""``evmm bench``: evmm against QEMU microvm on the same KVM (issue 6; docs/performance.md).

One module per benchmark row (``boot``, ``overhead``, ``blk``, ``net``, ``control``, ``density``, ``restore``);
``vmm`` makes both VMMs' command lines from one spec, ``console`` drives a VMM's serial line with arrival times,
``runner`` alternates the sides and saves ``results``, ``report`` draws the table and the chart.  The parsers
(``smaps``, ``fio``, ``iperf``, ``profile``) are pure and unit-tested.
"""
