"""Print seen-device figures (mean, variance, worst over the devices other than the unseen one) for sweep outputs."""
import json, glob, sys, numpy as np
d = sys.argv[1]
rows = []
for f in sorted(glob.glob(d + "/*.json")):
    j = json.load(open(f)); u = j["unseen"]
    for key in ("tail_per_device", "final_per_device"):
        per = j[key]; seen = {k: v for k, v in per.items() if k != u}
        a = np.array(list(seen.values()))
        allv = np.array(list(per.values()))
        print(f"{j['spec']['name']:22s} {key[:5]} seen mean {a.mean()*100:6.2f} var {a.var()*1e4:7.2f} worst {a.min()*100:6.2f} | all var {allv.var()*1e4:7.2f} | cu {j['compute']['compute_units']/1e6:.3f} isp {j['compute']['isp_on']/j['compute']['client_rounds']:.2f} swad {j['compute']['swad_on']/j['compute']['client_rounds']:.2f} t {j['seconds']:.0f}")
    print("   ", {k: round(v*100, 1) for k, v in j["tail_per_device"].items() if k != u})
    if j["switch_by_device"]:
        print("   ", {k: (round(v["level_ge1"], 2), round(v["median_signal"], 2)) for k, v in j["switch_by_device"].items()})
