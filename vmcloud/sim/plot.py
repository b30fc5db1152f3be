"""A small SVG chart of a run: active hosts and SLA violation over time (no plotting library)."""
import html


def svg(result, width: int = 800, height: int = 360) -> str:
    """Active hosts (left axis) and the share of active-host time in SLA violation (right)."""
    s = result.series
    times = [t / 3600 for t in s['time']]
    hosts = s['active_hosts']
    sla = [v * 100 for v in s['sla_violation']]
    left, right, top, bottom = 60, 60, 40, 40
    w, h = width - left - right, height - top - bottom
    t_max = max(times) if times else 1.0
    h_max = max(max(hosts, default=1), 1)
    s_max = max(max(sla, default=0.0), 1.0)

    def x(t):
        return left + w * t / t_max

    def path(values, vmax):
        pts = ' '.join(f'{x(t):.1f},{top + h - h * v / vmax:.1f}' for t, v in zip(times, values))
        return pts

    title = html.escape(f'{result.workload} {result.policy}'
                        + (f' {result.param}' if result.param is not None else '')
                        + f': {result.energy_kwh:.2f} kWh, {result.migrations} migrations')
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20">{title}</text>',
        f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="black"/>',
        f'<line x1="{left + w}" y1="{top}" x2="{left + w}" y2="{top + h}" stroke="black"/>',
        f'<polyline fill="none" stroke="steelblue" stroke-width="1.5" '
        f'points="{path(hosts, h_max)}"/>',
        f'<polyline fill="none" stroke="firebrick" stroke-width="1" '
        f'points="{path(sla, s_max)}"/>',
        f'<text x="5" y="{top - 8}" fill="steelblue">active hosts (max {h_max})</text>',
        f'<text x="{left + w - 150}" y="{top - 8}" fill="firebrick">'
        f'SLA violation % (max {s_max:.1f})</text>',
        f'<text x="{left + w / 2 - 20}" y="{height - 10}">hours</text>',
    ]
    for hour in range(0, int(t_max) + 1, 4):
        parts.append(f'<text x="{x(hour) - 4:.1f}" y="{top + h + 15}">{hour}</text>')
    parts.append('</svg>')
    return '\n'.join(parts) + '\n'
