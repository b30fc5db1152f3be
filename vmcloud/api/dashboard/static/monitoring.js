// The monitoring page, live: monitoring.json every 500 ms (the clouds' figures, the
// gateway's connections), history.json every 2 s (the charts, drawn as SVG polylines).
// The page as served shows the figures of its request; without this script it simply
// stays so. Text only ever goes in through textContent: nothing received becomes markup.
(function () {
  'use strict';

  const LIVE_MS = 500;
  const HISTORY_MS = 2000;
  const SVG = 'http://www.w3.org/2000/svg';
  const CLOUD_FIELDS = ['users', 'connections', 'connection_limit', 'available', 'meter',
                        'applications_running', 'applications_deployed', 'instances_running'];
  const CONNECTION_FIELDS = ['client', 'client_port', 'cloud', 'application', 'instance',
                             'listener_port', 'duration'];
  const CHARTS = [
    {id: 'chart-connections', metric: 'connections', unit: 'connections',
     title: 'Connections of each cloud over time'},
    {id: 'chart-instances', metric: 'instances_running', unit: 'instances',
     title: 'Running instances of each cloud over time'},
  ];
  const SERIES_COLOURS = 6;

  function duration(seconds) {
    if (seconds === null || seconds === undefined) {
      return '–';
    }
    const whole = Math.max(0, Math.floor(seconds));
    const hours = Math.floor(whole / 3600);
    const minutes = Math.floor((whole % 3600) / 60);
    const secs = whole % 60;
    const two = (n) => String(n).padStart(2, '0');
    if (hours) {
      return hours + ' h ' + two(minutes) + ' min';
    }
    if (minutes) {
      return minutes + ' min ' + two(secs) + ' s';
    }
    return secs + ' s';
  }

  // '2024-05-01T12:00:01.123456+00:00' -> '2024-05-01 12:00:01' (UTC, as the server shows it)
  function moment(iso) {
    return iso ? String(iso).replace('T', ' ').slice(0, 19) : '–';
  }

  function clock(ms) {
    return new Date(ms).toISOString().slice(11, 19);
  }

  function known(value) {
    return value !== null && value !== undefined;
  }

  function setText(element, text) {
    if (element && element.textContent !== text) {
      element.textContent = text;
    }
  }

  function setFigure(cell, value) {
    if (!cell) {
      return;
    }
    setText(cell, known(value) ? String(value) : 'unknown');
    cell.classList.toggle('unknown', !known(value));
  }

  function plural(count, word) {
    return count + ' ' + word + (count === 1 ? '' : 's');
  }

  // -- the clouds table --------------------------------------------------------------

  function newCloudRow(name) {
    const row = document.createElement('tr');
    row.dataset.cloud = name;
    const header = document.createElement('th');
    header.scope = 'row';
    header.textContent = name;
    row.appendChild(header);
    for (const field of CLOUD_FIELDS) {
      const cell = document.createElement('td');
      if (field === 'meter') {
        cell.className = 'usage';
        const meter = document.createElement('meter');
        meter.min = 0;
        cell.appendChild(meter);
      } else {
        cell.dataset.field = field;
      }
      row.appendChild(cell);
    }
    return row;
  }

  function updateClouds(clouds) {
    const body = document.querySelector('#clouds tbody');
    if (!body) {
      return;
    }
    const rows = new Map();
    for (const row of body.querySelectorAll('tr[data-cloud]')) {
      rows.set(row.dataset.cloud, row);
    }
    clouds.forEach((cloud, index) => {
      let row = rows.get(cloud.name);
      if (!row) {
        row = newCloudRow(cloud.name);
      }
      rows.delete(cloud.name);
      for (const field of CLOUD_FIELDS) {
        if (field !== 'meter') {
          setFigure(row.querySelector('[data-field="' + field + '"]'), cloud[field]);
        }
      }
      const meter = row.querySelector('meter');
      if (meter) {
        meter.max = Math.max(1, cloud.connection_limit || 1);
        meter.value = cloud.connections || 0;
        setText(meter, (cloud.connections || 0) + ' of ' + cloud.connection_limit);
      }
      if (body.children[index] !== row) {
        body.insertBefore(row, body.children[index] || null);
      }
    });
    for (const gone of rows.values()) {
      gone.remove();
    }
  }

  // -- the connections table ---------------------------------------------------------

  function connectionKey(connection) {
    return [connection.client, connection.client_port, connection.listener_port,
            connection.instance].join('|');
  }

  function connectionValue(connection, field) {
    if (field === 'duration') {
      return duration(connection.duration_seconds);
    }
    if (field === 'instance') {
      // Its name when the gateway knows it; its id otherwise (in the title either way).
      return connection.instance_name || connection.instance || '–';
    }
    const value = connection[field];
    if (field === 'application' && !value) {
      return '–';
    }
    return known(value) ? String(value) : '';
  }

  function updateConnections(connections) {
    const body = document.querySelector('#connections tbody');
    if (!body) {
      return;
    }
    const rows = new Map();
    for (const row of Array.from(body.querySelectorAll('tr'))) {
      if (row.dataset.key) {
        rows.set(row.dataset.key, row);
      } else {
        row.remove();
      }
    }
    connections.forEach((connection, index) => {
      const key = connectionKey(connection);
      let row = rows.get(key);
      if (!row) {
        row = document.createElement('tr');
        for (const field of CONNECTION_FIELDS) {
          const cell = document.createElement('td');
          cell.dataset.field = field;
          row.appendChild(cell);
        }
      }
      row.dataset.key = key;
      rows.delete(key);
      for (const field of CONNECTION_FIELDS) {
        setText(row.querySelector('[data-field="' + field + '"]'),
                connectionValue(connection, field));
      }
      const instance = row.querySelector('[data-field="instance"]');
      const instanceId = connection.instance || '';
      if (instance && instance.title !== instanceId) {
        instance.title = instanceId;
      }
      if (body.children[index] !== row) {
        body.insertBefore(row, body.children[index] || null);
      }
    });
    for (const gone of rows.values()) {
      gone.remove();
    }
    const none = document.getElementById('no-connections');
    if (none) {
      none.hidden = connections.length > 0;
    }
  }

  // -- status lines ------------------------------------------------------------------

  function updateStatus(live) {
    const gateway = live.gateway || 'unknown';
    const status = document.getElementById('gateway-status');
    if (status) {
      setText(status, gateway);
      status.classList.toggle('ok', gateway === 'ok');
      status.classList.toggle('down', gateway !== 'ok');
    }
    const updated = document.getElementById('updated');
    if (updated) {
      setText(updated, moment(live.sampled_at));
      updated.setAttribute('datetime', live.sampled_at || '');
    }
    const clouds = live.clouds || [];
    const connections = live.connections || [];
    const counted = gateway === 'ok' && clouds.every((cloud) => known(cloud.users));
    const users = clouds.reduce((sum, cloud) => sum + (cloud.users || 0), 0);
    // Read out (aria-live) only when it changes: every 500 ms would drown a reader.
    setText(document.getElementById('summary'), counted
      ? plural(connections.length, 'active connection') + ' from ' + plural(users, 'user') +
        ' in ' + plural(clouds.length, 'cloud') + '.'
      : 'Connections unknown: the gateway is not answering (' + plural(clouds.length, 'cloud') +
        ').');
  }

  function showStale(reason) {
    const stale = document.getElementById('stale');
    if (stale) {
      stale.hidden = !reason;
      setText(document.getElementById('stale-reason'), reason || '');
    }
  }

  // -- charts ------------------------------------------------------------------------

  function svgElement(name, attributes, text) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) {
      element.setAttribute(key, String(value));
    }
    if (text !== undefined) {
      element.textContent = text;
    }
    return element;
  }

  // The top of a chart's scale: the smallest of 2, 4, 6 or 10 times a power of ten at or
  // above ``value`` (at least 2), so that its half, the middle line, is a whole number.
  function ceiling(value) {
    if (!(value > 2)) {
      return 2;
    }
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [2, 4, 6, 10]) {
      if (step * power >= value) {
        return step * power;
      }
    }
    return 20 * power;
  }

  function seriesNames(samples) {
    const names = new Set();
    for (const sample of samples) {
      for (const name of Object.keys(sample.clouds || {})) {
        names.add(name);
      }
    }
    return Array.from(names).sort();
  }

  function seriesClass(index) {
    return 'series-' + (index % SERIES_COLOURS) +
      ' dash-' + (Math.floor(index / SERIES_COLOURS) % 3);
  }

  function drawChart(svg, chart, samples, names) {
    const box = svg.viewBox.baseVal;
    const width = box && box.width ? box.width : 640;
    const height = box && box.height ? box.height : 240;
    const left = 52;
    const right = 14;
    const top = 14;
    const bottom = 40;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;

    const times = samples.map((sample, index) => {
      const parsed = Date.parse(sample.at);
      return Number.isNaN(parsed) ? index : parsed;
    });
    const first = times.length ? times[0] : 0;
    const last = times.length ? times[times.length - 1] : 1;
    const span = last > first ? last - first : 1;
    let highest = 0;
    for (const sample of samples) {
      for (const name of names) {
        const value = ((sample.clouds || {})[name] || {})[chart.metric];
        if (known(value) && value > highest) {
          highest = value;
        }
      }
    }
    const scale = ceiling(highest);
    const x = (time) => left + ((time - first) / span) * plotWidth;
    const y = (value) => top + plotHeight - (value / scale) * plotHeight;

    const title = svg.querySelector('title');
    for (const child of Array.from(svg.childNodes)) {
      if (child !== title) {
        child.remove();
      }
    }
    // Axes and their labels.
    for (const value of [0, scale / 2, scale]) {
      svg.appendChild(svgElement('line', {x1: left, x2: left + plotWidth, y1: y(value),
                                          y2: y(value), class: value ? 'grid' : 'axis'}));
      svg.appendChild(svgElement('text', {x: left - 6, y: y(value) + 4, 'text-anchor': 'end'},
                                 String(value)));
    }
    svg.appendChild(svgElement('line', {x1: left, x2: left, y1: top, y2: top + plotHeight,
                                        class: 'axis'}));
    svg.appendChild(svgElement('text', {x: 14, y: top + plotHeight / 2, 'text-anchor': 'middle',
                                        transform: 'rotate(-90 14 ' + (top + plotHeight / 2) + ')'},
                               chart.unit));
    if (times.length) {
      const labelY = top + plotHeight + 16;
      svg.appendChild(svgElement('text', {x: left, y: labelY, 'text-anchor': 'start'},
                                 samples[0].at ? clock(first) : ''));
      svg.appendChild(svgElement('text', {x: left + plotWidth, y: labelY, 'text-anchor': 'end'},
                                 samples[samples.length - 1].at ? clock(last) : ''));
    }
    svg.appendChild(svgElement('text', {x: left + plotWidth / 2, y: height - 6,
                                        'text-anchor': 'middle'}, 'time (UTC)'));

    // One polyline per cloud; a sample without a figure (no gateway) breaks its line.
    const latest = [];
    names.forEach((name, index) => {
      let points = [];
      const flush = () => {
        if (points.length) {
          svg.appendChild(svgElement('polyline', {points: points.join(' '),
                                                  class: seriesClass(index),
                                                  'data-cloud': name}));
        }
        points = [];
      };
      let now = null;
      samples.forEach((sample, position) => {
        const value = ((sample.clouds || {})[name] || {})[chart.metric];
        if (known(value)) {
          points.push(x(times[position]).toFixed(1) + ',' + y(value).toFixed(1));
          now = value;
        } else {
          flush();
          now = null;
        }
      });
      flush();
      latest.push(name + ' ' + (known(now) ? now : 'unknown'));
    });
    if (title) {
      setText(title, chart.title + (latest.length ? '; now: ' + latest.join(', ') : '') + '.');
    }
  }

  function drawLegend(names) {
    const legend = document.getElementById('chart-legend');
    if (!legend) {
      return;
    }
    const shown = Array.from(legend.children).map((item) => item.dataset.cloud).join('|');
    if (shown === names.join('|')) {
      return;
    }
    legend.replaceChildren();
    names.forEach((name, index) => {
      const item = document.createElement('li');
      item.className = seriesClass(index);
      item.dataset.cloud = name;
      const label = document.createElement('span');
      label.textContent = name;
      item.appendChild(label);
      legend.appendChild(item);
    });
  }

  function drawCharts(history) {
    const samples = history.samples || [];
    const names = seriesNames(samples);
    for (const chart of CHARTS) {
      const svg = document.getElementById(chart.id);
      if (svg) {
        drawChart(svg, chart, samples, names);
      }
    }
    drawLegend(names);
  }

  // -- polling -----------------------------------------------------------------------

  class SessionEnded extends Error {}

  function getJson(url) {
    return fetch(url, {credentials: 'same-origin', cache: 'no-store',
                       headers: {Accept: 'application/json'}})
      .then((response) => {
        if (response.status === 401) {
          throw new SessionEnded('logged out');
        }
        if (!response.ok) {
          throw new Error('the server answered ' + response.status);
        }
        return response.json();
      });
  }

  // Calls ``use`` with ``url``'s answer every ``period`` ms (from the start of one request
  // to the start of the next; never two at once), until the session ends.
  function every(period, url, use) {
    const round = () => {
      const started = Date.now();
      getJson(url)
        .then((data) => {
          use(data);
          showStale(null);
          return true;
        })
        .catch((error) => {
          if (error instanceof SessionEnded) {
            window.location.assign('/dashboard/login?next=' +
                                   encodeURIComponent(window.location.pathname));
            return false;
          }
          showStale(error.message || String(error));
          return true;
        })
        .then((again) => {
          if (again) {
            window.setTimeout(round, Math.max(0, period - (Date.now() - started)));
          }
        });
    };
    round();
  }

  function start() {
    const live = document.getElementById('live');
    if (!live) {
      return;
    }
    every(LIVE_MS, live.dataset.liveUrl, (data) => {
      updateClouds(data.clouds || []);
      updateConnections(data.connections || []);
      updateStatus(data);
    });
    every(HISTORY_MS, live.dataset.historyUrl, drawCharts);
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
}());
