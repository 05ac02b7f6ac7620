"""Protocol-level probe of a JupyterLab symptom (issue 18): does the kernel publish status 'idle'
while an execute_request is still running, when the frontend sends a widget comm_msg meanwhile?
JupyterLab's status bar follows the latest iopub status message, whatever its parent.

    python experiments/kernel_status_probe.py     # the kernel of this environment

Prints the ipykernel version, whether tqdm.auto gives the widget bar, and every status message
from the long cell on, marking an 'idle' that arrives before the cell has finished. (With
ipykernel 7.4.0 and 6.31.0 alike the comm_msg waits for the cell: no early 'idle'; the
JupyterLab report is what pins ipykernel<7 in pyproject.toml.)"""
import queue
import time

from jupyter_client.manager import start_new_kernel

km, kc = start_new_kernel(kernel_name="python3")
t0 = time.time()
log = []
def pump(seconds):
    end = time.time() + seconds
    while time.time() < end:
        try:
            m = kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            continue
        log.append((time.time() - t0, m["msg_type"], m["parent_header"].get("msg_type"), m["content"]))
def run(code):
    kc.execute(code); kc.get_shell_msg(timeout=60); pump(0.5)
run("import ipykernel, tqdm.auto as ta, tqdm.notebook as tn; from IPython import get_ipython\n"
    "print('ipykernel', ipykernel.__version__, '| tqdm.auto gives the widget bar:', issubclass(ta.tqdm, tn.tqdm))")
print(" ", [c["text"].strip() for _, t, _, c in log if t == "stream"][-1])
run("import ipywidgets as w; s = w.IntSlider(); display(s)")
comm_id = next(c["comm_id"] for _, t, _, c in log if t == "comm_open"
               and c.get("data", {}).get("state", {}).get("_model_name") == "IntSliderModel")
kc.execute("import time\nfor i in range(6): time.sleep(0.5)\nprint('done, slider value', s.value)")
t_exec = time.time() - t0
pump(1.0)
t_comm = time.time() - t0
kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {
    "method": "update", "state": {"value": 7}, "buffer_paths": []}}))
pump(4.5)
t_done, text = next((t, c["text"].strip()) for t, ty, p, c in log if ty == "stream" and "done" in c.get("text", ""))
print(f"  execute sent {t_exec:.2f}s, slider comm_msg sent {t_comm:.2f}s, cell printed {text!r} at {t_done:.2f}s")
for t, ty, p, c in log:
    if ty == "status" and t > t_exec - 0.01:
        print(f"  {t:6.2f}s status {c['execution_state']:5s} (parent {p})"
              + ("   <-- idle while the cell still runs" if c["execution_state"] == "idle" and t < t_done else ""))
kc.stop_channels(); km.shutdown_kernel(now=True)
